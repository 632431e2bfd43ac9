"""The application layer: the console script, the shell and the options the plugin shares."""
