"""`postcopy bench`: each section is a module with run(opts) -> dict and table(result) -> list[str]."""
