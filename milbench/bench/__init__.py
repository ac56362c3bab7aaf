"""`milbench bench`: training-step and epoch benchmarks, the reference data path timed beside milbench, the report."""
