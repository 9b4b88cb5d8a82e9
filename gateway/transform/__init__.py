"""After-queue transformations of a message: DKIM signing, ARC sealing, encryption.

Anything that changes the body runs before signing, so a signature is made over
the bytes that are delivered.
"""
