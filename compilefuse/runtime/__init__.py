"""What a replica runs: loading and refitting a package, the prologue run on new weights, the heap,
and the private torch all of it touches. Nothing here imports the compiler (Dynamo, Inductor,
the rules or passes, ``jit`` or ``aot``): ``tests/test_imports.py`` holds it."""
