package kms

import (
	"errors"
	"fmt"
)

// PublicMessage returns text about err that is safe to show a client: the
// message of the outermost *Error unless it is internal or unavailable, whose
// causes may name files, devices or HSM return values.
func PublicMessage(err error) string {
	var e *Error
	if !errors.As(err, &e) {
		return ErrInternal.Error()
	}
	switch e.Kind {
	case KindInternal:
		return ErrInternal.Error()
	case KindUnavailable:
		if e.Msg != "" && e.Msg != ErrUnavailable.Error() {
			return e.Msg
		}
		return "service temporarily unavailable"
	}
	return e.Msg
}

// ErrOutcomeUnknown: the store did not say whether a change committed
// (etcd timed out, lost its leader or the connection, and did not answer
// when asked again within the store's budget). The change may or may not
// have been made.
var ErrOutcomeUnknown = errors.New("the store did not say whether the change committed")

// TamperMessage is what a client is told of a record that failed its
// integrity check.
const TamperMessage = "a record kmsd keeps failed its integrity check (edited, invented, moved or rolled back in the store); kmsd does not act on it: see the log and the audit record of this request"

// TamperError says which stored record failed its integrity check and how.
// Stores return it inside a KindInternal *Error.
type TamperError struct {
	Path   string // the record's place in the store
	Reason string
}

func (e *TamperError) Error() string {
	return fmt.Sprintf("stored record %q failed its integrity check: %s", e.Path, e.Reason)
}
