"""seqbench: measure what Transformers, S4D, Mamba, Mamba-2 and hybrids cost as sequences grow.

The pipeline, one folder a stage (docs/design.md): ``config`` / ``experiment`` (what to run) -> ``models`` and
``ops`` (what runs) -> ``run`` (measuring a sweep) -> ``analysis`` (fits, tables, plots, report); ``calc`` is the
analytic calculator of published architectures; ``cli`` holds every command.
"""
