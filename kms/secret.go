package kms

import (
	"crypto/subtle"
	"errors"
	"fmt"
)

// Secret holds plaintext key material. It has no String, refuses JSON and
// text marshalling, prints as [redacted] with every fmt verb, and compares in
// constant time. Reach the bytes only with Reveal, at the point of use.
type Secret struct {
	b []byte
}

// NewSecret takes ownership of b: the caller must not use b afterwards.
func NewSecret(b []byte) Secret { return Secret{b: b} }

// Reveal returns the plaintext bytes. The slice is shared: do not keep it.
func (s Secret) Reveal() []byte { return s.b }

// Len is the length of the material.
func (s Secret) Len() int { return len(s.b) }

// Equal compares two secrets in constant time (for equal lengths).
func (s Secret) Equal(o Secret) bool {
	return subtle.ConstantTimeCompare(s.b, o.b) == 1
}

// Wipe overwrites the material with zeros.
func (s Secret) Wipe() {
	clear(s.b)
}

var errSecretMarshal = errors.New("kms: refusing to marshal secret material")

// Format prints [redacted] for every verb, so %v, %s, %x and %#v are safe.
func (Secret) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte("[redacted]")) }

// MarshalJSON always fails.
func (Secret) MarshalJSON() ([]byte, error) { return nil, errSecretMarshal }

// MarshalText always fails.
func (Secret) MarshalText() ([]byte, error) { return nil, errSecretMarshal }

// GoString prints [redacted].
func (Secret) GoString() string { return "[redacted]" }
