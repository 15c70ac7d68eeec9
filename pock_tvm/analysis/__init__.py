"""Read-only analyses of Relax training graphs: layer kinds, FLOPs and bytes, reports."""
