"""Wire types (pydantic), one module per API area."""
