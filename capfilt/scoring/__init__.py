"""The filter: ITM/ITC scores from BLIP, BLIP-2 or CLIP, and the policy that keeps texts by them."""
