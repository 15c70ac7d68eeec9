"""Read-only analyses of Relax training graphs: layer kinds, FLOPs and bytes, memory, kernel checks."""
