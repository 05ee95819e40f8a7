"""Who answers a chat: this process alone, or several processes agreeing through PostgreSQL leases and signals."""
