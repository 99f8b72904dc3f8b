"""Files the pack writes: the delta file format (:mod:`.delta_file`: diff keys, metadata,
the resume state), on top of :mod:`trainer.persist` (atomic, checksummed safetensors)."""
