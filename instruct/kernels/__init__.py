"""Kernels: faster computations of what a plain path computes, each proven equal to it by its
own test file under ``tests/kernels/``.

- :mod:`~instruct.kernels.fused_lora`: a LoRA linear layer as one autograd function;
- :mod:`~instruct.kernels.dropout`: what LoRA dropout drops, drawn as masks or positions;
- :mod:`~instruct.kernels.packed_attention`: causal attention per example of a packed row,
  and the start-up check that packing gives the padded outputs;
- :mod:`~instruct.kernels.fused_ce`: the output layer and the cross-entropy in chunks;
- :mod:`~instruct.kernels.memory`: the frozen base in bf16, glibc keeping freed memory, no
  cyclic garbage collection while many small objects are built.
"""
