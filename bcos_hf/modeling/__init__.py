"""The remote-loadable model code: one flat folder, single-dot imports, copied next to every saved model."""
