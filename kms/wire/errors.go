package wire

import (
	"errors"
	"fmt"
)

// Kind classifies an error so that callers (the API layer above all) can map
// it to a response without parsing text. Match kinds with errors.Is against
// the sentinels below.
type Kind int

const (
	KindInternal Kind = iota
	KindInvalid
	KindNotFound
	KindAlreadyExists
	KindFailedPrecondition
	KindUnauthenticated
	KindPermissionDenied
	KindUnavailable
	KindTooLarge
	KindExhausted
	// KindExpired: the bearer token has expired (401, with its own
	// problem type so clients know to get a new one).
	KindExpired
)

// Sentinel errors, one per kind. Every *Error matches exactly one of them
// with errors.Is.
var (
	ErrInternal           = errors.New("internal error")
	ErrInvalid            = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnavailable        = errors.New("unavailable")
	ErrTooLarge           = errors.New("too large")
	ErrExhausted          = errors.New("resource exhausted")
	ErrExpired            = errors.New("token expired")
)

var kindSentinel = map[Kind]error{
	KindInternal:           ErrInternal,
	KindInvalid:            ErrInvalid,
	KindNotFound:           ErrNotFound,
	KindAlreadyExists:      ErrAlreadyExists,
	KindFailedPrecondition: ErrFailedPrecondition,
	KindUnauthenticated:    ErrUnauthenticated,
	KindPermissionDenied:   ErrPermissionDenied,
	KindUnavailable:        ErrUnavailable,
	KindTooLarge:           ErrTooLarge,
	KindExhausted:          ErrExhausted,
	KindExpired:            ErrExpired,
}

// Error is the one error type of the domain. Msg is written by this package
// for the caller and never contains secret material; Err is the cause, kept
// for logs and errors.Is / errors.As.
type Error struct {
	Kind Kind
	Op   string
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	s := e.Msg
	if e.Op != "" {
		s = e.Op + ": " + s
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is the sentinel of e's kind.
func (e *Error) Is(target error) bool { return kindSentinel[e.Kind] == target }

// Errorf builds an *Error of the given kind with a caller-safe message.
func Errorf(kind Kind, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// Wrap builds an *Error of the given kind around a cause. The cause's text
// goes to logs, never to API clients.
func Wrap(kind Kind, op string, err error) error {
	return &Error{Kind: kind, Op: op, Msg: kindSentinel[kind].Error(), Err: err}
}

// KindOf returns the kind of err: the kind of the outermost *Error in its
// chain, KindInternal when there is none.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}
