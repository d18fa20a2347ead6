"""The recipe language, one module per section of a recipe (`surgery.schema` is their face).

`base` (what every model shares) ← `layers` ← `ops`, `heads`; `backbone`, `placement`, `data`,
`training`, `tuning`, `serving` beside them; `recipe` gathers every section; `checks` runs the
checks that span sections. Imports point that one way, and nothing here imports torch.
"""
