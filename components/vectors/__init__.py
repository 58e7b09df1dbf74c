"""LanceDB tables: schema and marks, the build, ANN tuning, validation, the read path, the serving graph."""
