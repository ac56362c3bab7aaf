"""Training one fold: bag datasets, the device store, the epoch loop, protocols, provenance; nothing here picks
which folds to train (that is :mod:`milbench.runs`)."""
