"""Small pieces every layer uses: safe file reads (``safefs``) and name registries (``registry``).
Imports nothing of the project's own."""
