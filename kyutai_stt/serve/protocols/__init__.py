"""Protocol adapters: each translates one wire format to and from the Session API."""
