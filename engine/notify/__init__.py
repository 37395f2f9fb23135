"""Messages xswarm sends on its own: notifications (welcome, voicemail, quota, payment
failed, billing links) through the durable outbox, by SendGrid email and Twilio SMS."""
