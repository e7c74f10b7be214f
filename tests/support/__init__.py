"""Test helpers shared by several suites (contract, faults, ...), importing no suite."""
