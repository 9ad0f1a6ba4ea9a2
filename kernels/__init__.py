"""Kernels: plain-torch reference math (the definition of correct) and, on CUDA, Triton versions behind one dispatch."""
