"""The engine: dipstream's one decode back end. A decode loop for every family of the architecture
table with a decoder block, over a model file of its own (float32, int8 or int4 records), numpy
and the native library only (no torch, no Hugging Face forward), with the MLP in RAM or offloaded to
the file behind the simulator's own caches, under a whole-process memory budget. `build` makes one
from an `EngineSetup`; `decode.generate` runs it."""
