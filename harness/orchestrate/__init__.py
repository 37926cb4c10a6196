"""Running studies with Ray: the sweep, each cell and teacher as Ray work, tuning, status and
progress, rescoring, benchmarks, cost plans and seed rounds. The CLI sits on top of it."""
