package api

import (
	"bytes"
	"encoding/json"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// mergePatch applies an RFC 7396 JSON merge patch to target: an object in
// the patch merges into the target's object member by member, null removes
// a member, and anything else replaces.
func mergePatch(target, patch any) any {
	p, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	t, ok := target.(map[string]any)
	if !ok {
		t = map[string]any{}
	}
	for k, v := range p {
		if v == nil {
			delete(t, k)
			continue
		}
		t[k] = mergePatch(t[k], v)
	}
	return t
}

// decodeNumbers parses JSON keeping numbers as their text, so moduli above
// 2^53 survive the round trip.
func decodeNumbers(b []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	err := dec.Decode(&v)
	return v, err
}

// policyPatcher returns the function that applies a merge patch (the
// "policy" member of a PATCH body) to a key's current policy: fields the
// patch leaves out stay as they are, null resets a field to its default.
func policyPatcher(patch json.RawMessage) (func(kms.Policy) (kms.Policy, error), error) {
	pv, err := decodeNumbers(patch)
	if err != nil {
		return nil, &decodeError{"policy is not valid JSON"}
	}
	if _, ok := pv.(map[string]any); !ok {
		return nil, &decodeError{"policy must be a JSON object of the fields to change (JSON merge patch: absent fields stay, null resets)"}
	}
	return func(old kms.Policy) (kms.Policy, error) {
		cur, err := json.Marshal(toPolicy(old))
		if err != nil {
			return old, kms.Wrap(kms.KindInternal, "policy", err)
		}
		cv, err := decodeNumbers(cur)
		if err != nil {
			return old, kms.Wrap(kms.KindInternal, "policy", err)
		}
		merged, err := json.Marshal(mergePatch(cv, pv))
		if err != nil {
			return old, kms.Wrap(kms.KindInternal, "policy", err)
		}
		var p client.Policy
		dec := json.NewDecoder(bytes.NewReader(merged))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			return old, kms.Errorf(kms.KindInvalid, "policy: %s", describe(err))
		}
		return fromPolicy(&p)
	}, nil
}
