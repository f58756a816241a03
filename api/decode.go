package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/kmsd-project/kmsd/kms"
)

// MaxBody is the largest request body accepted (1 MiB).
const MaxBody = 1 << 20

// errBodyTooLarge marks a body over the limit.
var errBodyTooLarge = errors.New("request body is larger than 1 MiB")

// errMedia marks a body that is not JSON.
var errMedia = errors.New("the request body must be application/json")

// decodeError is a client mistake in a body, with a message safe to return.
type decodeError struct{ msg string }

func (e *decodeError) Error() string { return e.msg }

// decode reads a JSON body into v strictly: at most MaxBody bytes, JSON
// media type, no unknown or duplicate fields, no field names in another case,
// nothing after the value. An empty body is allowed only if optional.
func decode(r *http.Request, v any, optional bool) error {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, MaxBody))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errBodyTooLarge
	}
	if err != nil {
		return &decodeError{"could not read the request body"}
	}
	if ev := eventFrom(r); ev != nil {
		ev.bytesIn = len(body)
	}
	if !jsonDepthOK(body) {
		return &decodeError{fmt.Sprintf("the JSON body nests deeper than %d levels", maxDepth)}
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if optional {
			return nil
		}
		return &decodeError{"a JSON request body is required"}
	}
	// A body must say it is JSON (the spec's 415): no sniffing.
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/json" {
		return errMedia
	}
	if err := checkKeys(body); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &decodeError{describe(err)}
	}
	if _, err := dec.Token(); err != io.EOF {
		return &decodeError{"unexpected data after the JSON value"}
	}
	return nil
}

// binaryFields are the fields that hold base64 strings; encoding/json would
// also take a JSON array of numbers for them, which is refused.
var binaryFields = map[string]bool{"message": true, "signature": true, "context": true, "ciphertext": true, "payload": true}

// fieldMin is the schema's minimum of the number fields whose zero the Go
// types cannot tell from "absent" (and would read as "the default"): an
// explicit value below it is refused, as openapi.yaml says.
var fieldMin = map[string]float64{
	"destroy_wait_days":      1,
	"days":                   1,
	"decrypt_log_precision":  1,
	"min_decryption_version": 1,
}

// bodyRules are the API's JSON rules beyond its Go types: base64 fields,
// minimums, and "params", which holds a Lattigo parameters literal with
// field names of its own.
var bodyRules = kms.JSONRules{Binary: binaryFields, Min: fieldMin, Free: map[string]bool{"params": true}}

// checkKeys refuses duplicate and non-API field names, bad base64 and
// numbers below their minimum (kms.CheckJSON with bodyRules).
func checkKeys(body []byte) error {
	if err := kms.CheckJSON(body, bodyRules); err != nil {
		return &decodeError{err.Error()}
	}
	return nil
}

// describe turns a decoding error into a message that names the field and
// does not echo the input.
func describe(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	var b64 base64.CorruptInputError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("malformed JSON at byte %d", syn.Offset)
	case errors.As(err, &typ):
		if typ.Field != "" {
			return fmt.Sprintf("field %q must be %s", typ.Field, typ.Type.String())
		}
		return "the request body must be a JSON object"
	case errors.As(err, &b64):
		return "a binary field is not valid standard base64"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "truncated JSON"
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return "unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")
	}
	return "malformed request body"
}
