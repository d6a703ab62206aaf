"""Rules shipped with the core. Domain rules live in the plugins."""
