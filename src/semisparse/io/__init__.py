"""Files: what semisparse writes and reads, apart from the training loop that decides when.

* :mod:`.files` - the one atomic write and the one checked ``torch.load`` every file goes through;
* :mod:`.digest` - the one content digest both file kinds record when written and verify when read;
* :mod:`.codec` - one sparse weight <-> kept values + the smallest index form (N:M bits, fan-in columns,
  bitmap or CSR), no file involved;
* :mod:`.compressed` - ``ss.save`` / ``ss.load``: the compressed safetensors checkpoint built from the codec.

(The training checkpoint's layout and reader live with the code that writes it, :mod:`semisparse.train.checkpoint`.)
"""
