"""Model zoo: the registry and cards (:mod:`.registry`, :mod:`.cards`), shared layers (:mod:`.layers`), and one
module per model (or family), each reading like its paper's method section."""
