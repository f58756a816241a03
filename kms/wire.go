package kms

import "github.com/kmsd-project/kmsd/kms/wire"

// The wire formats and the error kinds live in kms/wire, a leaf that the
// SDK, kmsd-mcp and the stores import without linking the service; the
// service uses them under these names.

type (
	Kind              = wire.Kind
	Error             = wire.Error
	JSONRules         = wire.JSONRules
	Envelope          = wire.Envelope
	Statement         = wire.Statement
	InputRef          = wire.InputRef
	Attestation       = wire.Attestation
	BlobRef           = wire.BlobRef
	GaloisRef         = wire.GaloisRef
	SwitchingRef      = wire.SwitchingRef
	ManifestExtension = wire.ManifestExtension
	ThresholdRef      = wire.ThresholdRef
	Manifest          = wire.Manifest
	AuditRecord       = wire.AuditRecord
	RestoreInfo       = wire.RestoreInfo
	Role              = wire.Role
)

const (
	KindInternal           = wire.KindInternal
	KindInvalid            = wire.KindInvalid
	KindNotFound           = wire.KindNotFound
	KindAlreadyExists      = wire.KindAlreadyExists
	KindFailedPrecondition = wire.KindFailedPrecondition
	KindUnauthenticated    = wire.KindUnauthenticated
	KindPermissionDenied   = wire.KindPermissionDenied
	KindUnavailable        = wire.KindUnavailable
	KindTooLarge           = wire.KindTooLarge
	KindExhausted          = wire.KindExhausted
	KindExpired            = wire.KindExpired

	RestoreOp = wire.RestoreOp

	AttestationContext  = wire.AttestationContext
	StatementInput      = wire.StatementInput
	StatementEvaluation = wire.StatementEvaluation
	ManifestContext     = wire.ManifestContext
	ExtensionContext    = wire.ExtensionContext
	MaxVersionsPage     = wire.MaxVersionsPage

	RoleAdmin     = wire.RoleAdmin
	RoleWorker    = wire.RoleWorker
	RoleAuditor   = wire.RoleAuditor
	RoleDecryptor = wire.RoleDecryptor
	RoleEncryptor = wire.RoleEncryptor
	RoleEvaluator = wire.RoleEvaluator
)

var (
	ErrInternal           = wire.ErrInternal
	ErrInvalid            = wire.ErrInvalid
	ErrNotFound           = wire.ErrNotFound
	ErrAlreadyExists      = wire.ErrAlreadyExists
	ErrFailedPrecondition = wire.ErrFailedPrecondition
	ErrUnauthenticated    = wire.ErrUnauthenticated
	ErrPermissionDenied   = wire.ErrPermissionDenied
	ErrUnavailable        = wire.ErrUnavailable
	ErrExpired            = wire.ErrExpired
)

// Errorf builds an *Error of the given kind with a caller-safe message.
func Errorf(kind Kind, format string, args ...any) error {
	return wire.Errorf(kind, format, args...)
}

// Wrap builds an *Error of the given kind around a cause.
func Wrap(kind Kind, op string, err error) error { return wire.Wrap(kind, op, err) }

// KindOf returns the kind of err (KindInternal without an *Error).
func KindOf(err error) Kind { return wire.KindOf(err) }

// CheckJSON checks a body against rules (wire.CheckJSON).
func CheckJSON(b []byte, rules JSONRules) error { return wire.CheckJSON(b, rules) }

// PlainKey reports whether a JSON key is plain (wire.PlainKey).
func PlainKey(k string) bool { return wire.PlainKey(k) }

// ParseEnvelope decodes an envelope strictly (wire.ParseEnvelope).
func ParseEnvelope(b []byte, maxCiphertext int) (*Envelope, error) {
	return wire.ParseEnvelope(b, maxCiphertext)
}

// DecodeAuditRecord parses a record in its canonical form.
func DecodeAuditRecord(b []byte) (*AuditRecord, error) { return wire.DecodeAuditRecord(b) }

// ValidateName checks a key name supplied from outside.
func ValidateName(name string) error { return wire.ValidateName(name) }
