"""iollm's sans-IO core: records, wire messages, hashing, signing, state machines.

Nothing in this package does I/O or reads the clock: it imports the standard library,
msgpack and pynacl only (a test checks this). Callers pass ``now`` and bytes in and get
values or a named error out.
"""
