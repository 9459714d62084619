"""The operator's dashboard at ``/admin/``: login, overview, keys, transactions, wallet."""

from nodeprov.http.admin.app import AdminCore, build_admin_app

__all__ = ["AdminCore", "build_admin_app"]
