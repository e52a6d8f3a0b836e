"""IoT example: sensor readings over MQTT -> anomaly detection -> alerts -> notifications."""
