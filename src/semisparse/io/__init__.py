"""Files: the compressed safetensors checkpoint (:mod:`.compressed`)."""
