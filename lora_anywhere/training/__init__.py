"""Training adapted (or plain) models: the shared Trainer, tasks, regularisers and
rank selection. Built on the adapter core's public functions; the core never imports
from here."""
