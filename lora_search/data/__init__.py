"""Task data: the embedded tasks, strict file readers, loading in any common layout, preference pairs, the data report."""
