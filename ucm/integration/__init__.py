"""Engine integrations: glue between ucm (stores, sparse algorithms, device layer) and serving engines."""
