"""`tunesmith plan`: pick a method and its settings for a time and memory budget."""
