"""The thin Kafka layer: clients built from Settings, delivery tracking, topics. Knows no fraud."""
