"""Webhooks: Twilio SMS/voice, SendGrid email, Stripe billing and the identity API.

Every provider route follows one order: verify the signature over the untouched body →
store the raw event in ``webhook_inbox`` (deduplicated) → answer 2xx → an ``InboxProcessor``
task applies the effects with retries, backoff and dead letters. ``WebhooksServer`` runs the
app alone (``xswarm webhooks serve``) or inside the runtime.
"""
