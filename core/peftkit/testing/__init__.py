"""peftkit's conformance kit: properties every method must satisfy, for our plugins and third parties'."""
