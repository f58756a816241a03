package kms

import (
	"context"
	"errors"
)

// IdentityKeyName is where the service keeps its own ML-DSA-65 identity key,
// which signs manifests and audit checkpoints. ValidateName refuses the name,
// so no request can reach it.
const IdentityKeyName = internalPrefix + "identity"

// IdentityKind is the kind of the identity key.
const IdentityKind = "ml-dsa-65"

// EnsureIdentity creates the identity key on first start.
func (s *Service) EnsureIdentity(ctx context.Context) error {
	_, err := s.store.GetKey(ctx, IdentityKeyName)
	if err == nil {
		return nil
	}
	if !errors.Is(err, ErrNotFound) {
		return asUnavailable("store", err)
	}
	_, _, err = s.createKey(ctx, IdentityKeyName, IdentityKind, Policy{AllowedOperations: []Operation{OpSign, OpVerify}},
		s.systemRecord("create identity key", IdentityKeyName, 1))
	if errors.Is(err, ErrAlreadyExists) {
		return nil
	}
	return err
}

// Identity returns the primary version and public key of the identity key.
func (s *Service) Identity(ctx context.Context) (uint64, []byte, error) {
	_, v, err := s.resolve(ctx, IdentityKeyName, 0)
	if err != nil {
		return 0, nil, err
	}
	return v.Number, v.PublicKey, nil
}

// SignAsIdentity signs msg with the identity key under the given context.
func (s *Service) SignAsIdentity(ctx context.Context, msg, context []byte) ([]byte, uint64, error) {
	return s.sign(ctx, IdentityKeyName, msg, context)
}
