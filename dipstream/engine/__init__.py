"""The lean engine: a decode loop for the supported families (Llama-style, Gemma 3) over a
quantized model file, numpy and the native kernels only (no torch, no Hugging Face forward), with
the MLP in RAM or offloaded to the file behind the simulator's own caches, under a whole-process
memory budget."""
