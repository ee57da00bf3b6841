"""The model-level parts every conversion stage uses: graph, registry, folding, plan, builder.

Nothing here imports the stages above it (`keras_powerquant.pipeline`,
`refinement`, `synthesis`): they import these.
"""
