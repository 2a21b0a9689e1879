"""Training a caption decoder: the loop (:mod:`.loop`), the model and data a config names (:mod:`.setup`) and
caption sets with their batches (:mod:`.data`)."""
