"""Running the platform: `agencyllm up`'s supervisor and local stack, the cluster's init steps
(schema gate, first admin key), the local database, the placeholder model, the air-gap bundle.

May import: `rayserve` and everything below it. Never `cli`.
"""
