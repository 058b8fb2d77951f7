"""A thin shim over torch's private compiler internals, one module per torch subsystem: the one
folder a torch upgrade should touch.

``torch._dynamo``, ``torch._functorch`` and ``torch._inductor`` move between releases. Every access
the compiler side of compilefuse makes to them goes through a small function here that does one
thing and, where a layout has changed before, checks it instead of assuming it; what differs by
release is a named gate in ``gates``. No logic of bnfuse lives here, and importing a module here
changes nothing in torch.

- ``gates``: what this torch release can do, by name.
- ``inductor``: config, modes, decompositions, the compile entry point, marks on its graphs.
- ``patterns``: Inductor's pattern matcher, as the rules use it.
- ``onednn``: oneDNN's CPU operators and Inductor's weight packing for them.
- ``dynamo``: Dynamo's graph inputs, sources, exceptions and the global state its guards check.
- ``fake_tensors``: the tracing context of a compile and its fake tensors.
- ``aot_autograd``: what AOTAutograd knows of a compile in progress, and its partitioner's tags.
- ``pre_dispatch``: a training graph traced to aten ops before autograd (autocast, checkpointing).
- ``code_cache``: Inductor's generated-code modules, and graphs pickled for caches.
- ``aoti``: AOTInductor packages.
- ``ops``: what an operator is and does.

The replica's own shim, which imports no compiler, is ``compilefuse/runtime/_torch_runtime.py``; the
benchmark's is ``compilefuse/bench/_torch_private.py``.
"""
