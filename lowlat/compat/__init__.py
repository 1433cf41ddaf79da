"""Drop-in facades for other libraries' APIs (``lowlat.compat.deep_ep``)."""
