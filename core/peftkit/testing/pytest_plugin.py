"""pytest plugin of the conformance kit (entry point ``pytest11``). Kept light: imports nothing heavy."""
