"""Weight files in other frameworks' names."""
