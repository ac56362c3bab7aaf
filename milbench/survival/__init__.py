"""Survival core: losses and read-outs of the hazard, cox and mdn heads (:mod:`.losses`), time binning
(:mod:`.binning`), held-out metrics (:mod:`.metrics`, scikit-survival and lifelines) and the statistics behind the
leaderboards (:mod:`.statistics`). Import the module you need: this package imports nothing itself, so the command
line and the GPU benchmark never load libraries they do not use."""
