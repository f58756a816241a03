package etcd

import "context"

// ClaimTurn claims the append turn for s, as a replica that lost
// starveAfter appends in a row does.
func ClaimTurn(ctx context.Context, s *Store) (bool, error) { return s.turn.claim(ctx, s) }
