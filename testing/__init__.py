"""
Test doubles shared by the test suite (C{tests/}) and the benchmark
(C{bench/}): the fake Ollama server in L{testing.fake_ollama}.  Not part of
the installed product.
"""
